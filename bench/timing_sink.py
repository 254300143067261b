"""A minimal SMTP sink that notes when each mail arrives, for the latency figure.

Postfix's smtp-sink (C) takes the throughput runs but cannot say when a mail
arrived; aiosmtpd can, but its asyncio line-by-line reading adds about a
millisecond per mail on a 2-core machine, which would be the sink's time, not
the queue's. This one reads with blocking sockets, a thread per connection,
and records the time at which the end-of-data line arrives, keyed by the
envelope recipient. It speaks just enough SMTP for consumer.py: EHLO (with
PIPELINING, 8BITMIME, SMTPUTF8), MAIL, RCPT, DATA, RSET, NOOP, QUIT.

`judge(recipient)`, if given, is asked at each end of data for the reply: None
accepts the mail (its arrival is noted), bytes such as b"454 ...\r\n" refuse it
(bench/quota_sink.py uses it to enforce a sending quota).
"""

import socket
import threading
import time

_EHLO = b"250-timing-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"


class TimingSink:
    def __init__(self, port, judge=None):
        self.arrivals = {}  # recipient -> time.time() when its mail's final dot came
        self.judge = judge
        self.server = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            conn, _ = self.server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.sendall(b"220 timing-sink ESMTP\r\n")
        buffer, recipient, in_data = b"", None, False
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return conn.close()
            buffer += chunk
            replies = []
            while True:
                if in_data:
                    end = buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        break
                    refusal = self.judge(recipient) if self.judge else None
                    if refusal is None:
                        self.arrivals[recipient] = time.time()
                    buffer, in_data = buffer[end + 5 :], False
                    replies.append(refusal or b"250 ok\r\n")
                    continue
                end = buffer.find(b"\r\n")
                if end < 0:
                    break
                line, buffer = buffer[:end], buffer[end + 2 :]
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    replies.append(_EHLO)
                elif verb == b"RCPT":
                    recipient = line[line.index(b"<") + 1 : line.index(b">")].decode("utf-8")
                    replies.append(b"250 ok\r\n")
                elif verb == b"DATA":
                    # "\r\n" before the content, so that the end-of-data search
                    # also finds a final dot right after the 354.
                    buffer, in_data = b"\r\n" + buffer, True
                    replies.append(b"354 go ahead\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"".join(replies) + b"221 bye\r\n")
                    return conn.close()
                else:  # MAIL, RSET, NOOP
                    replies.append(b"250 ok\r\n")
            if replies:
                conn.sendall(b"".join(replies))

    def close(self):
        self.server.close()
