"""Bounces and complaints as real senders write them (the tests' samples).

Postfix (a DSN returning the headers only, as with a large message), Exim (a
DSN returning the whole message, whose body is 8-bit UTF-8; and its delay
warning), Gmail (a DSN with an HTML part, returning the whole message) and
Amazon SES (an ARF complaint). Each is addressed, as its sender does, to the
envelope sender of the mail it is about: `to`, our VERP return path (or the
plain sender)."""

CRLF = b"\r\n"


def _crlf(text):
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


def returned_headers(to, recipient, message_id, subject="Tin tháng 11"):
    return (
        "Return-Path: <%s>\n"
        "Received: from mail.example.org (mail.example.org [192.0.2.10])\n"
        "\tby mx.example.com (Postfix) with ESMTPS id 4Q1X2Y3Z4\n"
        "\tfor <%s>; Fri,  4 Dec 2026 20:30:00 +0000 (UTC)\n"
        "From: Shop <shop@example.org>\n"
        "To: %s\n"
        "Subject: =?utf-8?b?VGluIHRow6FuZyAxMQ==?=\n"
        "Date: Fri, 04 Dec 2026 20:29:59 +0000\n"
        "Message-ID: %s\n"
        "MIME-Version: 1.0\n" % (to, recipient, recipient, message_id)
    )


def postfix_dsn(to, recipient, message_id, status="5.1.1", action="failed"):
    """Postfix 3.7: 'Undelivered Mail Returned to Sender', text/rfc822-headers."""
    reply = (
        "550 5.1.1 <%s>: Recipient address rejected: User unknown" % recipient
        if status.startswith("5.1")
        else "550 %s Message rejected as spam" % status
    )
    return _crlf(
        "Return-Path: <>\n"
        "Delivered-To: %(to)s\n"
        "Received: by mx.example.com (Postfix)\n"
        "\tid 3F1A2B4C5D; Fri,  4 Dec 2026 20:30:01 +0000 (UTC)\n"
        "Date: Fri,  4 Dec 2026 20:30:01 +0000 (UTC)\n"
        "From: MAILER-DAEMON@mx.example.com (Mail Delivery System)\n"
        "Subject: Undelivered Mail Returned to Sender\n"
        "To: %(to)s\n"
        "Auto-Submitted: auto-replied\n"
        "MIME-Version: 1.0\n"
        "Content-Type: multipart/report; report-type=delivery-status;\n"
        '\tboundary="3F1A2B4C5D.1796416201/mx.example.com"\n'
        "Content-Transfer-Encoding: 8bit\n"
        "Message-Id: <20261204203001.3F1A2B4C5D@mx.example.com>\n"
        "\n"
        "This is a MIME-encapsulated message.\n"
        "\n"
        "--3F1A2B4C5D.1796416201/mx.example.com\n"
        "Content-Description: Notification\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "\n"
        "This is the mail system at host mx.example.com.\n"
        "\n"
        "I'm sorry to have to inform you that your message could not\n"
        "be delivered to one or more recipients. It's attached below.\n"
        "\n"
        "<%(recipient)s>: host mx2.example.com[192.0.2.20] said: %(reply)s (in\n"
        "    reply to RCPT TO command)\n"
        "\n"
        "--3F1A2B4C5D.1796416201/mx.example.com\n"
        "Content-Description: Delivery report\n"
        "Content-Type: message/delivery-status\n"
        "\n"
        "Reporting-MTA: dns; mx.example.com\n"
        "X-Postfix-Queue-ID: 3F1A2B4C5D\n"
        "X-Postfix-Sender: rfc822; %(to)s\n"
        "Arrival-Date: Fri,  4 Dec 2026 20:30:00 +0000 (UTC)\n"
        "\n"
        "Final-Recipient: rfc822; %(recipient)s\n"
        "Original-Recipient: rfc822;%(recipient)s\n"
        "Action: %(action)s\n"
        "Status: %(status)s\n"
        "Remote-MTA: dns; mx2.example.com\n"
        "Diagnostic-Code: smtp; %(reply)s\n"
        "\n"
        "--3F1A2B4C5D.1796416201/mx.example.com\n"
        "Content-Description: Undelivered Message Headers\n"
        "Content-Type: text/rfc822-headers\n"
        "\n"
        "%(headers)s"
        "\n"
        "--3F1A2B4C5D.1796416201/mx.example.com--\n"
        % dict(
            to=to,
            recipient=recipient,
            status=status,
            action=action,
            reply=reply,
            headers=returned_headers(to, recipient, message_id),
        )
    )


def exim_dsn(to, recipient, message_id, delayed=False):
    """Exim 4.96: 'Mail delivery failed: returning message to sender', the whole
    message returned as message/rfc822 with its 8-bit UTF-8 body; or, delayed,
    'Warning: message ... delayed 24 hours' (Action: delayed, 4.0.0)."""
    if delayed:
        subject = "Warning: message 1rABCD-000123-EF delayed 24 hours"
        action, status, code = "delayed", "4.0.0", "451 4.2.0 Mailbox busy, try again later"
    else:
        subject = "Mail delivery failed: returning message to sender"
        action, status, code = "failed", "5.0.0", "550 5.1.1 No such user here"
    head = (
        "Return-path: <>\n"
        "Envelope-to: %(to)s\n"
        "Delivery-date: Fri, 04 Dec 2026 20:31:02 +0000\n"
        "Received: from Debian-exim by mx.example.net with local (Exim 4.96)\n"
        "\tid 1rABCE-000124-GH\n"
        "\tfor %(to)s; Fri, 04 Dec 2026 20:31:02 +0000\n"
        "X-Failed-Recipients: %(recipient)s\n"
        "Auto-Submitted: auto-replied\n"
        "From: Mail Delivery System <Mailer-Daemon@mx.example.net>\n"
        "To: %(to)s\n"
        "References: %(message_id)s\n"
        "Content-Type: multipart/report; report-type=delivery-status;"
        " boundary=1796416262-eximdsn-1804289383\n"
        "MIME-Version: 1.0\n"
        "Subject: %(subject)s\n"
        "Message-Id: <E1rABCE-000124-GH@mx.example.net>\n"
        "Date: Fri, 04 Dec 2026 20:31:02 +0000\n"
        "\n"
        "--1796416262-eximdsn-1804289383\n"
        "Content-type: text/plain; charset=us-ascii\n"
        "\n"
        "This message was created automatically by mail delivery software.\n"
        "\n"
        "A message that you sent could not be delivered to one or more of its\n"
        "recipients. This is a permanent error. The following address(es) failed:\n"
        "\n"
        "  %(recipient)s\n"
        "    host mx.example.net [192.0.2.30]\n"
        "    SMTP error from remote mail server after RCPT TO:<%(recipient)s>:\n"
        "    %(code)s\n"
        "\n"
        "--1796416262-eximdsn-1804289383\n"
        "Content-type: message/delivery-status\n"
        "\n"
        "Reporting-MTA: dns; mx.example.net\n"
        "\n"
        "Action: %(action)s\n"
        "Final-Recipient: rfc822;%(recipient)s\n"
        "Status: %(status)s\n"
        "Remote-MTA: dns; mx.example.net\n"
        "Diagnostic-Code: smtp; %(code)s\n"
        "\n"
        "--1796416262-eximdsn-1804289383\n"
        "Content-type: message/rfc822\n"
        "\n"
        "%(headers)s"
        'Content-Type: text/plain; charset="utf-8"\n'
        "Content-Transfer-Encoding: 8bit\n"
        "\n"
        % dict(
            to=to,
            recipient=recipient,
            message_id=message_id,
            subject=subject,
            action=action,
            status=status,
            code=code,
            headers=returned_headers(to, recipient, message_id),
        )
    )
    body = "Kính gửi Nguyễn Văn Anh,\nĐơn hàng của bạn đã được giao. ắ ằ ẳ ẵ ặ\n"
    return _crlf(head + body + "\n--1796416262-eximdsn-1804289383--\n")


def gmail_dsn(to, recipient, message_id):
    """Gmail: 'Delivery Status Notification (Failure)', text and HTML, then the
    delivery status and the whole message."""
    return _crlf(
        "Delivered-To: %(to)s\n"
        "Return-Path: <>\n"
        "From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>\n"
        "To: %(to)s\n"
        "Auto-Submitted: auto-replied\n"
        "Subject: Delivery Status Notification (Failure)\n"
        "References: %(message_id)s\n"
        "In-Reply-To: %(message_id)s\n"
        "X-Failed-Recipients: %(recipient)s\n"
        "Message-ID: <6571a2b3.050a0220.abcde.0001.GMR@mx.google.com>\n"
        "Date: Fri, 04 Dec 2026 12:31:03 -0800 (PST)\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/report; boundary="000000000000a1b2c3"; '
        "report-type=delivery-status\n"
        "\n"
        "--000000000000a1b2c3\n"
        'Content-Type: multipart/related; boundary="000000000000a1b2c4"\n'
        "\n"
        "--000000000000a1b2c4\n"
        'Content-Type: multipart/alternative; boundary="000000000000a1b2c5"\n'
        "\n"
        "--000000000000a1b2c5\n"
        'Content-Type: text/plain; charset="UTF-8"\n'
        "\n"
        "** Address not found **\n"
        "\n"
        "Your message wasn't delivered to %(recipient)s because the address couldn't "
        "be found, or is unable to receive mail.\n"
        "\n"
        "--000000000000a1b2c5\n"
        'Content-Type: text/html; charset="UTF-8"\n'
        "\n"
        "<html><body><h2>Address not found</h2></body></html>\n"
        "--000000000000a1b2c5--\n"
        "--000000000000a1b2c4--\n"
        "--000000000000a1b2c3\n"
        "Content-Type: message/delivery-status\n"
        "\n"
        "Reporting-MTA: dns; googlemail.com\n"
        "Received-From-MTA: dns; mail.example.org\n"
        "Arrival-Date: Fri, 04 Dec 2026 12:31:02 -0800 (PST)\n"
        "X-Original-Message-ID: %(message_id)s\n"
        "\n"
        "Final-Recipient: rfc822; %(recipient)s\n"
        "Action: failed\n"
        "Status: 5.1.1\n"
        "Diagnostic-Code: smtp; The email account that you tried to reach does not exist.\n"
        " Please try double-checking the recipient's email address for typos or\n"
        " unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser\n"
        "Last-Attempt-Date: Fri, 04 Dec 2026 12:31:03 -0800 (PST)\n"
        "\n"
        "--000000000000a1b2c3\n"
        "Content-Type: message/rfc822\n"
        "\n"
        "%(headers)s"
        'Content-Type: text/plain; charset="utf-8"\n'
        "Content-Transfer-Encoding: base64\n"
        "\n"
        "S8OtbmggZ+G7rWk=\n"
        "\n"
        "--000000000000a1b2c3--\n"
        % dict(
            to=to,
            recipient=recipient,
            message_id=message_id,
            headers=returned_headers(to, recipient, message_id),
        )
    )


def ses_complaint(to, recipient, message_id):
    """Amazon SES email feedback forwarding: an ARF report (RFC 5965)."""
    return _crlf(
        "Return-Path: <>\n"
        "Delivered-To: %(to)s\n"
        "From: complaints@email-abuse.amazonses.com\n"
        "To: %(to)s\n"
        "Subject: complaint about message from 192.0.2.10\n"
        "Message-ID: <0100018c3a4b5c6d-complaint@email.amazonses.com>\n"
        "Date: Fri, 4 Dec 2026 20:40:00 +0000\n"
        "MIME-Version: 1.0\n"
        "Content-Type: multipart/report; report-type=feedback-report;\n"
        '\tboundary="----=_Part_12345_67890.1796417000000"\n'
        "\n"
        "------=_Part_12345_67890.1796417000000\n"
        "Content-Type: text/plain; charset=UTF-8\n"
        "Content-Transfer-Encoding: 7bit\n"
        "\n"
        "This is an email abuse report for an email message received from IP 192.0.2.10\n"
        "on Fri, 4 Dec 2026 20:30:00 UTC.\n"
        "\n"
        "------=_Part_12345_67890.1796417000000\n"
        "Content-Type: message/feedback-report\n"
        "Content-Transfer-Encoding: 7bit\n"
        "\n"
        "Feedback-Type: abuse\n"
        "User-Agent: Amazon SES Feedback Forwarding\n"
        "Version: 1\n"
        "Original-Mail-From: <%(to)s>\n"
        "Original-Rcpt-To: <%(recipient)s>\n"
        "Arrival-Date: Fri, 4 Dec 2026 20:30:00 +0000\n"
        "Source-IP: 192.0.2.10\n"
        "Reported-Domain: example.org\n"
        "\n"
        "------=_Part_12345_67890.1796417000000\n"
        "Content-Type: text/rfc822-headers\n"
        "Content-Transfer-Encoding: 7bit\n"
        "\n"
        "%(headers)s"
        "\n"
        "------=_Part_12345_67890.1796417000000--\n"
        % dict(to=to, recipient=recipient, headers=returned_headers(to, recipient, message_id))
    )


def auto_reply(to):
    """Not a report: an out-of-office answer."""
    return _crlf(
        "From: someone@example.com\nTo: %s\nSubject: Out of office\n"
        "Auto-Submitted: auto-replied\n\nI am away until Monday.\n" % to
    )
