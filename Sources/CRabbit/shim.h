#ifndef STAPS_CRABBIT_SHIM_H
#define STAPS_CRABBIT_SHIM_H

// rabbitmq-c 0.13+ installs <rabbitmq-c/amqp.h>; Debian 12's 0.11 installs flat headers.
#if __has_include(<rabbitmq-c/amqp.h>)
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/tcp_socket.h>
#include <rabbitmq-c/ssl_socket.h>
#else
#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <amqp_ssl_socket.h>
#endif

#include <linux/sockios.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/time.h>

// amqp_login is variadic: Swift can't call it.
static inline amqp_rpc_reply_t staps_amqp_login_plain(amqp_connection_state_t state, char const *vhost,
                                                      int channel_max, int frame_max, int heartbeat,
                                                      char const *user, char const *password) {
    return amqp_login(state, vhost, channel_max, frame_max, heartbeat, AMQP_SASL_METHOD_PLAIN, user, password);
}

// amqp_login_with_properties is variadic too.
static inline amqp_rpc_reply_t staps_amqp_login_plain_with_properties(amqp_connection_state_t state, char const *vhost,
                                                                      int channel_max, int frame_max, int heartbeat,
                                                                      amqp_table_t const *properties,
                                                                      char const *user, char const *password) {
    return amqp_login_with_properties(state, vhost, channel_max, frame_max, heartbeat, properties,
                                      AMQP_SASL_METHOD_PLAIN, user, password);
}

// Bytes written to a socket and not yet acknowledged by the peer (SIOCOUTQ); -1 when the
// kernel does not say.
static inline long staps_socket_unacked(int fd) {
    int queued = 0;
    if (ioctl(fd, SIOCOUTQ, &queued) != 0) return -1;
    return (long)queued;
}

// Asks for a send buffer of `bytes` (the kernel caps it at net.core.wmem_max, doubled) and
// returns what the socket has; -1 when the kernel does not say.
static inline long staps_socket_set_send_buffer(int fd, int bytes) {
    int size = 0;
    socklen_t len = sizeof(size);
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes));
    if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, &len) != 0) return -1;
    return (long)size;
}

// Method ids Swift sees only as macros with casts.
static inline amqp_method_number_t staps_connection_close_method(void) { return AMQP_CONNECTION_CLOSE_METHOD; }
static inline amqp_method_number_t staps_channel_close_method(void) { return AMQP_CHANNEL_CLOSE_METHOD; }
static inline amqp_method_number_t staps_queue_bind_method(void) { return AMQP_QUEUE_BIND_METHOD; }
static inline amqp_method_number_t staps_queue_bind_ok_method(void) { return AMQP_QUEUE_BIND_OK_METHOD; }
static inline amqp_method_number_t staps_queue_unbind_method(void) { return AMQP_QUEUE_UNBIND_METHOD; }
static inline amqp_method_number_t staps_queue_unbind_ok_method(void) { return AMQP_QUEUE_UNBIND_OK_METHOD; }
static inline amqp_method_number_t staps_basic_cancel_method(void) { return AMQP_BASIC_CANCEL_METHOD; }
static inline amqp_method_number_t staps_basic_ack_method(void) { return AMQP_BASIC_ACK_METHOD; }
static inline amqp_method_number_t staps_basic_nack_method(void) { return AMQP_BASIC_NACK_METHOD; }
static inline amqp_method_number_t staps_connection_blocked_method(void) { return AMQP_CONNECTION_BLOCKED_METHOD; }
static inline amqp_method_number_t staps_connection_unblocked_method(void) { return AMQP_CONNECTION_UNBLOCKED_METHOD; }
static inline amqp_flags_t staps_basic_correlation_id_flag(void) { return AMQP_BASIC_CORRELATION_ID_FLAG; }
static inline amqp_flags_t staps_basic_delivery_mode_flag(void) { return AMQP_BASIC_DELIVERY_MODE_FLAG; }
static inline amqp_flags_t staps_basic_type_flag(void) { return AMQP_BASIC_TYPE_FLAG; }
static inline amqp_flags_t staps_basic_app_id_flag(void) { return AMQP_BASIC_APP_ID_FLAG; }
static inline amqp_flags_t staps_basic_message_id_flag(void) { return AMQP_BASIC_MESSAGE_ID_FLAG; }

#endif
