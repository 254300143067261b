"""An SMTP sink that answers chosen recipients, for ever, with a chosen reply at
RCPT, and accepts every other mail: for bench.py's poison scenario (issue 18),
where one job's recipient is answered `451 4.3.0 Try again later`, a greylisting
450 or Gmail's 450 4.2.1 beside 2,000 normal mails. The run without the poison
job uses this same server with no reply set, so that the two differ only by it.

It also notes each mail's size and, with digest=True, the SHA-256 of its
largest MIME part once decoded from base64: the big-attachment scenario checks
with it that every 15 MB attachment arrived intact.

Like bench/timing_sink.py it reads with blocking sockets, a thread per
connection, but keeps each connection's bytes in a bytearray and looks for the
end of data only in what is new, so that a 20 MB mail costs a few copies, not
one per chunk. It speaks what consumer.py needs: EHLO (PIPELINING, 8BITMIME,
SMTPUTF8), MAIL, RCPT, DATA, RSET, NOOP, QUIT; DATA after every recipient was
refused is answered 554, as Postfix does, and the client sends no content.

    python bench/poison_sink.py PORT [ADDRESS=REPLY ...]   (prints "ready", then
    serves until interrupted and prints what it saw)
"""

import binascii
import collections
import hashlib
import signal
import socket
import sys
import threading
import time

_EHLO = b"250-poison-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
_NO_RECIPIENT = b"554 5.5.1 Error: no valid recipients\r\n"
_END = b"\r\n.\r\n"


class PoisonSink:
    def __init__(self, port, replies=None, digest=False):
        # lowercased address -> the reply line its RCPT gets, e.g. b"451 4.3.0 Try again later"
        self.replies = {
            address.lower(): reply.rstrip(b"\r\n") + b"\r\n"
            for address, reply in (replies or {}).items()
        }
        self.digest = digest
        self.arrivals = {}  # recipient -> time.time() when its (last) mail's final dot came
        self.sizes = {}  # recipient -> bytes of its (last) mail, dot-stuffing included
        self.digests = {}  # recipient -> SHA-256 (hex) of its mail's largest part, decoded
        self.refused = collections.Counter()  # recipient -> RCPT TO answered with its reply
        self.connections = 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", port), backlog=512)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:  # closed
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            self._session(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def _session(self, conn):
        conn.sendall(b"220 poison-sink ESMTP\r\n")
        buffer = bytearray()
        recipients = []  # accepted in this transaction
        in_data, scanned = False, 0  # bytes of the content already searched for the end
        while True:
            chunk = conn.recv(262144)
            if not chunk:
                return
            buffer += chunk
            replies = []
            while True:
                if in_data:
                    if buffer.startswith(b".\r\n"):  # an empty content
                        end = -2
                    else:
                        end = buffer.find(_END, max(0, scanned - 4))
                        if end < 0:
                            scanned = len(buffer)
                            break
                    self._arrived(recipients, bytes(buffer[: end + 2]))
                    del buffer[: end + 5]
                    recipients, in_data, scanned = [], False, 0
                    replies.append(b"250 2.0.0 ok\r\n")
                    continue
                end = buffer.find(b"\r\n")
                if end < 0:
                    break
                line = bytes(buffer[:end])
                del buffer[: end + 2]
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    replies.append(_EHLO)
                elif verb == b"MAIL":
                    recipients = []
                    replies.append(b"250 2.1.0 ok\r\n")
                elif verb == b"RCPT":
                    address = line[line.find(b"<") + 1 : line.rfind(b">")].decode("utf-8").lower()
                    reply = self.replies.get(address)
                    if reply:
                        with self.lock:
                            self.refused[address] += 1
                        replies.append(reply)
                    else:
                        recipients.append(address)
                        replies.append(b"250 2.1.5 ok\r\n")
                elif verb == b"DATA":
                    if recipients:
                        in_data = True
                        replies.append(b"354 go ahead\r\n")
                    else:
                        replies.append(_NO_RECIPIENT)
                elif verb == b"QUIT":
                    conn.sendall(b"".join(replies) + b"221 2.0.0 bye\r\n")
                    return
                elif verb in (b"RSET", b"NOOP"):
                    if verb == b"RSET":
                        recipients = []
                    replies.append(b"250 2.0.0 ok\r\n")
                else:
                    replies.append(b"502 5.5.2 command not recognised\r\n")
            if replies:
                conn.sendall(b"".join(replies))

    def _arrived(self, recipients, content):
        now = time.time()
        digest = largest_part_digest(content) if self.digest else None
        with self.lock:
            for address in recipients:
                self.arrivals[address] = now
                self.sizes[address] = len(content)
                if digest:
                    self.digests[address] = digest

    def report(self):
        """What it saw, as plain data (for a pipe between processes)."""
        with self.lock:
            return dict(
                arrivals=dict(self.arrivals),
                sizes=dict(self.sizes),
                digests=dict(self.digests),
                refused=dict(self.refused),
                connections=self.connections,
            )

    def close(self):
        self.server.close()


def largest_part_digest(content):
    """SHA-256 (hex) of the largest base64 body among the MIME parts of a mail's
    content (its attachment, when it has a big one), decoded."""
    head_end = content.find(b"\r\n\r\n")
    largest = b""
    # Parts start after a delimiter line "--boundary"; each part's body after its
    # blank line. Base64 bodies hold no "--", so splitting on "\r\n--" is enough.
    for part in content[head_end:].split(b"\r\n--"):
        blank = part.find(b"\r\n\r\n")
        if blank >= 0 and len(part) - blank > len(largest):
            largest = part[blank + 4 :]
    try:
        return hashlib.sha256(binascii.a2b_base64(largest)).hexdigest()
    except binascii.Error:
        return "not base64"


def main():
    if len(sys.argv) < 2 or not sys.argv[1].isdigit():
        raise SystemExit("usage: poison_sink.py PORT [ADDRESS=REPLY ...]")
    replies = {}
    for pair in sys.argv[2:]:
        address, _, reply = pair.partition("=")
        if not reply:
            raise SystemExit("error: %r is not ADDRESS=REPLY" % pair)
        replies[address] = reply.encode("utf-8")
    sink = PoisonSink(int(sys.argv[1]), replies)
    print("ready", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        pass
    sink.close()
    seen = sink.report()
    print("%d mails accepted, refused: %s" % (len(seen["arrivals"]), seen["refused"] or "none"))


if __name__ == "__main__":
    main()
