# -*- coding: utf-8 -*-
"""Autobahn|Testsuite's fuzzing client against a staps node, through a relay (Python 2.7).

staps never echoes: it relays what one client sends to every *other* client on the same
path. So for every case this driver first connects a relay client to a fresh channel
(ws://HOST:PORT/autobahn-<case>-<random>) that sends back whatever it receives (text as
text, binary as binary), and only once the relay's handshake is complete does Autobahn's
fuzzing client connect to that same path and run the case. When the case's connection
ends, the relay closes and the next case starts on a new channel.

Run by scripts/autobahn inside the Autobahn virtualenv; see `scripts/autobahn --help`.
"""

import argparse
import binascii
import json
import os
import sys

# Installs the epoll reactor, as wstest does; must come before anything imports the reactor.
from autobahntestsuite import choosereactor  # noqa: F401

from twisted.internet import reactor

from autobahn.twisted.websocket import connectWS, WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahntestsuite.case import CaseCategories
from autobahntestsuite.fuzzing import FuzzingClientFactory

# How long a relay may take to answer our close before its TCP connection is dropped.
RELAY_CLOSE_TIMEOUT = 3.0

OUTCOMES = ["OK", "NON-STRICT", "FAILED", "INFORMATIONAL", "UNIMPLEMENTED"]


def log(message):
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


class RelayProtocol(WebSocketClientProtocol):
    """Sends every message it receives back, unchanged."""

    def onOpen(self):
        self.factory.driver.relayOpened(self)

    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        self.factory.closeCode = code
        self.factory.closeReason = reason

    def connectionLost(self, reason):
        WebSocketClientProtocol.connectionLost(self, reason)
        self.factory.driver.relayLost(self)


class RelayFactory(WebSocketClientFactory):
    protocol = RelayProtocol

    def __init__(self, driver, url):
        WebSocketClientFactory.__init__(self, url=url, useragent="staps-autobahn-relay")
        # Unlimited message size (the default), no fragmentation of its own; it is a
        # plain client of the node.
        self.setProtocolOptions(openHandshakeTimeout=10, closeHandshakeTimeout=RELAY_CLOSE_TIMEOUT)
        self.driver = driver
        self.closeCode = None
        self.closeReason = None

    def clientConnectionFailed(self, connector, reason):
        self.driver.fatal("relay could not connect to %s: %s" % (self.url, reason.getErrorMessage()))


class RelayedFuzzingClientFactory(FuzzingClientFactory):
    """Autobahn's fuzzing client, one fresh channel and one relay per case.

    The stock factory connects once and then reconnects the same connector (same URL) for
    each case from clientConnectionLost. This one is constructed with no servers, so the
    base constructor connects nowhere, and then drives the cases itself: relay first, then
    the case's connection, then the relay's close, then the next case.
    """

    def __init__(self, spec):
        servers = spec["servers"]
        FuzzingClientFactory.__init__(self, dict(spec, servers=[]))
        self.spec = spec
        self.currServer = -1
        if not self.nextServer():  # agent, session parameters and protocol options of servers[0]
            raise ValueError("no server in spec")
        self.baseUrl = servers[0]["url"].rstrip("/")
        self.relay = None
        self.relayFactory = None
        self.caseUrl = None
        self.casesRun = 0
        self.failure = None
        self.finished = False
        self.afterRelay = None

    # -- the sequence of one case ------------------------------------------------------

    def start(self):
        log("Relay: every case gets its own channel under %s/autobahn-<case>-<random>" % self.baseUrl)
        reactor.callWhenRunning(self.nextRelayedCase)

    def nextRelayedCase(self):
        if not self.nextCase():
            self.finish()
            return
        channel = "autobahn-%s-%s" % (self.currentCaseId, binascii.hexlify(os.urandom(8)))
        self.caseUrl = "%s/%s" % (self.baseUrl, channel)
        self.relay = None
        self.relayFactory = RelayFactory(self, self.caseUrl)
        connectWS(self.relayFactory)

    def relayOpened(self, relay):
        # The relay is in the channel: everything the case's client sends from now on reaches it.
        self.relay = relay
        server = self.spec["servers"][self.currServer]
        self.setSessionParameters(url=self.caseUrl,
                                  origin=server.get("origin", None),
                                  protocols=server.get("protocols", []),
                                  useragent=self.useragent)
        connectWS(self, contextFactory=self.contextFactory)

    def clientConnectionLost(self, connector, reason):
        # The case's connection is gone and FuzzingProtocol.connectionLost has logged its result.
        self.casesRun += 1
        self.closeRelay(lambda: reactor.callLater(0, self.nextRelayedCase))

    def clientConnectionFailed(self, connector, reason):
        self.fatal("case %s could not connect to %s: %s" % (self.currentCaseId, self.caseUrl, reason.getErrorMessage()))

    def closeRelay(self, then):
        relay = self.relay
        if relay is None or relay.state == WebSocketProtocol.STATE_CLOSED:
            self.relay = None
            then()
            return
        self.afterRelay = then
        relay.sendClose(1000)
        reactor.callLater(RELAY_CLOSE_TIMEOUT + 1, self.dropRelay, relay)

    def dropRelay(self, relay):
        if relay is self.relay and relay.state != WebSocketProtocol.STATE_CLOSED:
            relay.dropConnection(abort=True)

    def relayLost(self, relay):
        if relay.factory is not self.relayFactory:
            return  # an earlier case's relay, dropped after its close timed out
        if self.relay is None:
            self.fatal("the relay for case %s did not get through its opening handshake with %s: %s"
                       % (self.currentCaseId, self.caseUrl, relay.wasNotCleanReason))
            return
        self.relay = None
        then, self.afterRelay = self.afterRelay, None
        if then is not None:
            then()
        else:
            # The case is still running and can no longer get its echo.
            log("Relay of case %s was closed by the node during the case: %s %s"
                % (self.currentCaseId, self.relayFactory.closeCode, self.relayFactory.closeReason or ""))

    # -- the end ---------------------------------------------------------------------------

    def finish(self):
        self.finished = True
        self.createReports()
        if self.casesRun != len(self.specCases):
            self.failure = "ran %d of %d cases" % (self.casesRun, len(self.specCases))
        reactor.stop()

    def fatal(self, message):
        self.failure = message  # printed by main once the reactor has stopped
        if self.agents:
            self.createReports()
        if reactor.running:
            reactor.stop()


def chapterOf(caseId):
    return caseId.split(".")[0]


def summarize(outdir, agent):
    """Prints the per-chapter outcome counts and every case that is not OK."""
    with open(os.path.join(outdir, "index.json")) as f:
        index = json.load(f)[agent]
    chapters = {}
    for caseId, result in index.items():
        counts = chapters.setdefault(chapterOf(caseId), dict((o, 0) for o in OUTCOMES + ["other"]))
        behavior = result["behavior"]
        counts[behavior if behavior in OUTCOMES else "other"] += 1

    def key(caseId):
        return tuple(int(p) for p in caseId.split("."))

    header = "%-8s %-32s" % ("chapter", "") + "".join("%15s" % o for o in OUTCOMES) + "%8s" % "total"
    log("")
    log(header)
    totals = dict((o, 0) for o in OUTCOMES + ["other"])
    for chapter in sorted(chapters, key=int):
        counts = chapters[chapter]
        for o in counts:
            totals[o] += counts[o]
        row = "%-8s %-32s" % (chapter, CaseCategories.get(chapter, "")[:32])
        row += "".join("%15d" % counts[o] for o in OUTCOMES) + "%8d" % sum(counts.values())
        if counts["other"]:
            row += "  (+%d other)" % counts["other"]
        log(row)
    log("%-8s %-32s" % ("all", "") + "".join("%15d" % totals[o] for o in OUTCOMES) + "%8d" % sum(totals.values()))

    notOK = [c for c in index if index[c]["behavior"] not in ("OK", "INFORMATIONAL", "UNIMPLEMENTED")
             or index[c]["behaviorClose"] not in ("OK", "INFORMATIONAL")]
    if notOK:
        log("")
        log("Cases not OK (behavior / close behavior, remote close code):")
    for caseId in sorted(notOK, key=key):
        result = index[caseId]
        with open(os.path.join(outdir, result["reportfile"])) as f:
            detail = json.load(f)
        log("  %-8s %s / %s, close %s: %s" % (caseId, result["behavior"], result["behaviorClose"],
                                               result["remoteCloseCode"], strip(detail["description"])))
        log("           %s %s" % (detail["result"], detail["resultClose"]))


def strip(html):
    out, inTag = [], False
    for ch in html:
        if ch == "<":
            inTag = True
        elif ch == ">":
            inTag = False
        elif not inTag:
            out.append(ch)
    return " ".join("".join(out).split())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the node's websocket base URL, e.g. ws://127.0.0.1:26901")
    parser.add_argument("--out", required=True, help="directory for index.json, index.html and per-case reports")
    parser.add_argument("--agent", default="staps", help="agent name in the reports (default staps)")
    parser.add_argument("--exclude", action="append", default=[], help="case glob to leave out (repeatable)")
    parser.add_argument("--summarize-only", action="store_true", help="print the counts of an existing --out and exit")
    parser.add_argument("cases", nargs="*", help="case globs, e.g. 1.* 9.1.* 12.1.1")
    args = parser.parse_args()

    if args.summarize_only:
        summarize(args.out, args.agent)
        return 0
    if not args.cases:
        parser.error("no cases given")

    spec = {
        "outdir": args.out,
        "servers": [{"agent": args.agent, "url": args.url}],
        "cases": args.cases,
        "exclude-cases": args.exclude,
        "exclude-agent-cases": {},
    }
    if not os.path.isdir(args.out):
        os.makedirs(args.out)
    factory = RelayedFuzzingClientFactory(spec)
    if not factory.specCases:
        log("no Autobahn case matches %s" % " ".join(args.cases))
        return 2
    factory.start()
    reactor.run()
    if not factory.finished and not factory.failure:
        # The reactor was stopped from outside (scripts/autobahn's timeout sends SIGTERM).
        factory.failure = "stopped during case %s, after %d of %d cases" % (
            factory.currentCaseId, factory.casesRun, len(factory.specCases))
        if factory.agents:
            factory.createReports()
    if os.path.exists(os.path.join(args.out, "index.json")):
        summarize(args.out, args.agent)
    if factory.failure:
        log("FATAL: " + factory.failure)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
