import StapsNode

/// Channel name → topic routing key.
///
/// Topic keys are dot-separated words of at most 255 bytes, and `*` and `#` are wildcards in
/// binding keys. The key is `c.` followed by the name as one word: bytes `A-Z a-z 0-9 - _`
/// stay, every other byte (`.`, `*`, `#`, `%`, `/`, `~`, non-ASCII, …) becomes `~XX` (hex).
/// The escaped word holds no `.`, is never `*` or `#`, and `~` is itself escaped, so the
/// mapping is injective and no binding can match another channel's key.
/// An escaped name longer than 250 bytes becomes `h.` + SHA-1 hex of the name instead (the
/// `h.` space can't meet the `c.` one). Every message also carries its exact channel name in
/// the body, and a node delivers only to that exact name, so even a hash collision could not
/// cross channels: it could only bring a node a message it then ignores.
public enum RoutingKey {
    public static func forChannel(_ name: String) -> String {
        let hex = Array("0123456789ABCDEF".utf8)
        var out: [UInt8] = Array("c.".utf8)
        out.reserveCapacity(2 + name.utf8.count * 3)
        for b in name.utf8 {
            switch b {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
                UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "_"):
                out.append(b)
            default:
                out.append(UInt8(ascii: "~"))
                out.append(hex[Int(b >> 4)])
                out.append(hex[Int(b & 0xF)])
            }
        }
        if out.count > 252 {
            return "h." + WebSocketAccept.sha1Hex(name)
        }
        return String(decoding: out, as: UTF8.self)
    }
}
