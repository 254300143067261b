"""An SMTP sink with a sending quota, as Amazon SES enforces one: at most `rate`
mails accepted in any one-second window; past it, the end of data is answered

    454 4.7.0 Throttling failure: Maximum sending rate exceeded.

(SES's words). For bench.py's quota scenario: does a burst against a quota end
with no mail dead, the quota well used, and not too many throttled replies?
Built on bench/timing_sink.py (the SMTP part, and the arrival times).
"""

import collections
import threading
import time

from timing_sink import TimingSink

THROTTLED = b"454 4.7.0 Throttling failure: Maximum sending rate exceeded.\r\n"


class QuotaSink:
    def __init__(self, port, rate):
        self.rate = rate
        self.accepted = collections.deque()  # time.monotonic() of the last second's mails
        self.throttled = 0  # 454 replies given
        self.lock = threading.Lock()
        self.sink = TimingSink(port, judge=self._judge)

    @property
    def arrivals(self):
        return self.sink.arrivals

    def _judge(self, recipient):
        now = time.monotonic()
        with self.lock:
            while self.accepted and self.accepted[0] <= now - 1.0:
                self.accepted.popleft()
            if len(self.accepted) >= self.rate:
                self.throttled += 1
                return THROTTLED
            self.accepted.append(now)
            return None

    def close(self):
        self.sink.close()
