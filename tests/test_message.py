"""Building mails of every kind (pure functions): what each column of a job and
each attachment becomes, read back with the `email` package; what is refused."""

import base64
import datetime
import email
import email.policy
import functools
import json

import dkim
import pytest

from mailqueue import config as configuration
from mailqueue import signing
from mailqueue.config import ConfigError, SmtpSettings
from mailqueue.message import BadMail, Composer, text_of_html

CREATED = datetime.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.timezone.utc)
# Bytes that break careless mail code: NULs, a line that is a single dot (the end
# of DATA), bare CR and LF, every byte value.
BINARY = b"%PDF-1.4\x00\x00\r\n.\r\n.\n..\r\n\rlone CR\nlone LF" + bytes(range(256)) * 4
VIETNAMESE = "Kính gửi Nguyễn Văn Anh,\nĐơn hàng của bạn đã được giao. ắ ằ ẳ ẵ ặ ố ồ ổ ỗ ộ\n"
HTML = ("<html><head><title>Không hiện</title><style>p { color: red }</style></head>"
        "<body><h1>Xin chào</h1><p>Đơn hàng <b>#42</b> &amp; quà tặng</p>"
        "<script>alert('không hiện')</script><img src=\"cid:logo\"></body></html>")


def composer(**smtp):
    settings = dict(sender="Hộp thư <noreply@example.com>", subject="Default")
    settings.update(smtp)
    return Composer(SmtpSettings(**settings))


def job(**columns):
    fields = dict(job_id=7, email="someone@example.com", subject=None, content_message="Hello",
                  created_at=CREATED, html_message=None, sender=None, reply_to=None, cc=None,
                  bcc=None, headers=None)
    fields.update(columns)
    return fields


def attachment(filename="file.bin", content=BINARY, content_type="application/octet-stream",
               content_id=None):
    return dict(filename=filename, content_type=content_type, content=memoryview(content),
                content_id=content_id)


def build(attachments=(), smtp=None, **columns):
    return composer(**(smtp or {})).build(job(**columns), attachments)


def parse(mail):
    return email.message_from_bytes(mail.data, policy=email.policy.default)


def structure(message, depth=0):
    """The MIME tree as nested content types, e.g. ['multipart/mixed', [...]]."""
    if not message.is_multipart():
        return message.get_content_type()
    return [message.get_content_type(), [structure(p, depth + 1) for p in message.iter_parts()]]


def head_lines(mail):
    return mail.data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


# ---------------------------------------------------------------------------
# The structures
# ---------------------------------------------------------------------------

def test_plain_text_stays_a_single_text_part_whatever_else_the_job_has():
    mail = build(content_message=VIETNAMESE, sender="shop@example.org", cc=["c@example.com"],
                 reply_to="help@example.org", headers={"X-Campaign": "nov"})
    message = parse(mail)
    assert structure(message) == "text/plain"
    assert message.get_content() == VIETNAMESE.replace("\n", "\r\n")


def test_html_with_text_is_multipart_alternative_text_first():
    message = parse(build(content_message=VIETNAMESE, html_message=HTML))
    assert structure(message) == ["multipart/alternative", ["text/plain", "text/html"]]
    text, html = message.iter_parts()
    assert text.get_content() == VIETNAMESE.replace("\n", "\r\n")
    assert html.get_content() == HTML
    assert html.get_content_charset() == "utf-8"


@pytest.mark.parametrize("content_message", [None, "", "  \n "])
def test_html_alone_gets_a_text_part_of_its_visible_text(content_message):
    message = parse(build(content_message=content_message, html_message=HTML))
    assert structure(message) == ["multipart/alternative", ["text/plain", "text/html"]]
    text = next(message.iter_parts()).get_content()
    assert text == "Xin chào\r\n\r\nĐơn hàng #42 & quà tặng\r\n"


def test_visible_text_leaves_out_scripts_styles_and_the_head_and_keeps_paragraphs():
    html = ("<!DOCTYPE html><html><head><meta charset=utf-8><title>T</title>"
            "<script>var x = '<p>no</p>';</script></head><body>"
            "<STYLE>.a{}</STYLE><p>one\n   two</p><div>three<br>four</div>"
            "<ul><li>a</li><li>b</li></ul><template><p>hidden</p></template>"
            "<p>&lt;tag&gt; &eacute; &#8212;&nbsp;end</p></body></html>")
    assert text_of_html(html) == "one two\n\nthree\nfour\n\na\nb\n\n<tag> é — end\n"
    assert text_of_html("<pre>keep\n    this</pre><p>x</p>") == "keep\n    this\n\nx\n"
    assert text_of_html("<img src='cid:poster'>") == ""
    assert text_of_html("<table><tr><td>Bàn</td><td>1</td></tr><tr><th>Ghế</th><td>4</td>"
                        "</tr></table><p>x</p>") == "Bàn\t1\nGhế\t4\n\nx\n"


def test_inline_parts_with_html_are_multipart_related_with_content_ids():
    logo = b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256))
    message = parse(build(html_message=HTML, attachments=[
        attachment("logo.png", logo, "image/png", "logo")]))
    assert structure(message) == ["multipart/related", [
        ["multipart/alternative", ["text/plain", "text/html"]], "image/png"]]
    assert message.get_param("type") == "multipart/alternative"
    _, image = message.iter_parts()
    assert image["Content-ID"] == "<logo>"
    assert image.get_content_disposition() == "inline"
    assert image.get_filename() == "logo.png"
    assert image.get_payload(decode=True) == logo


def test_html_inline_parts_and_attachments_nest_mixed_related_alternative():
    message = parse(build(content_message=VIETNAMESE, html_message=HTML, attachments=[
        attachment("logo.png", b"png", "image/png", "<logo@shop.example>"),
        attachment("hoá đơn.pdf", BINARY, "application/pdf"),
        attachment("notes.txt", VIETNAMESE.encode("utf-8"), "text/plain; charset=utf-8")]))
    assert structure(message) == ["multipart/mixed", [
        ["multipart/related", [["multipart/alternative", ["text/plain", "text/html"]],
                               "image/png"]],
        "application/pdf", "text/plain"]]
    _, pdf, notes = message.iter_parts()
    assert pdf.get_content_disposition() == "attachment"
    assert pdf.get_filename() == "hoá đơn.pdf"
    assert pdf.get_payload(decode=True) == BINARY
    assert notes.get_content_charset() == "utf-8"
    assert notes.get_payload(decode=True).decode("utf-8") == VIETNAMESE
    related = next(message.iter_parts())
    assert list(related.iter_parts())[1]["Content-ID"] == "<logo@shop.example>"


def test_attachments_without_html_go_with_the_text_in_multipart_mixed():
    message = parse(build(content_message=VIETNAMESE, attachments=[
        attachment("a.bin"), attachment("logo.png", b"png", "image/png", "logo")]))
    assert structure(message) == ["multipart/mixed", ["text/plain", "application/octet-stream",
                                                      "image/png"]]
    text, binary, logo = message.iter_parts()
    assert text.get_content() == VIETNAMESE.replace("\n", "\r\n")
    assert binary.get_payload(decode=True) == BINARY
    assert logo["Content-ID"] == "<logo>", "kept, though no HTML refers to it"


@pytest.mark.parametrize("filename", [
    "báo cáo tháng mười một — bản cuối cùng đã duyệt, có chữ ký của giám đốc.pdf",
    "ファイル名.txt", 'quote " and semicolon; .txt', "a" * 255, "ắ" * 255, "50% off; a=b.txt",
])
def test_any_filename_reads_back_and_every_header_line_stays_short(filename):
    mail = build(attachments=[attachment(filename)])
    [_, part] = parse(mail).iter_parts()
    assert part.get_filename() == filename
    assert part.get_param("name") == filename
    assert all(len(line) <= 78 for line in mail.data.split(b"\r\n")), "folded, RFC 5322 2.1.1"
    assert mail.data.isascii()


def test_empty_file_and_default_content_type():
    [_, part] = parse(build(attachments=[dict(filename="empty", content=b"",
                                              content_type=None, content_id=None)])).iter_parts()
    assert part.get_content_type() == "application/octet-stream"
    assert part.get_payload(decode=True) == b""


def test_every_line_is_crlf_terminated_and_short_in_a_big_mail():
    mail = build(html_message=HTML * 200, attachments=[attachment(content=BINARY * 100)])
    assert b"\n" not in mail.data.replace(b"\r\n", b"")
    assert b"\r" not in mail.data.replace(b"\r\n", b"")
    assert max(len(line) for line in mail.data.split(b"\r\n")) <= 78


# ---------------------------------------------------------------------------
# Addresses and headers
# ---------------------------------------------------------------------------

def test_sender_reply_to_cc_and_bcc():
    mail = build(sender="Cửa hàng <shop@example.org>", reply_to='"Help, Desk" <help@example.org>',
                 cc=["Bob <bob@example.com>", "carol@example.com", "someone@example.com"],
                 bcc=["hidden@example.com", "carol@example.com"])
    message = parse(mail)
    assert message["From"].addresses[0].display_name == "Cửa hàng"
    assert message["From"].addresses[0].addr_spec == "shop@example.org"
    assert str(message["Reply-To"]) == '"Help, Desk" <help@example.org>'
    assert [a.addr_spec for a in message["Cc"].addresses] == [
        "bob@example.com", "carol@example.com", "someone@example.com"]
    assert message["Bcc"] is None
    assert b"hidden" not in mail.data, "Bcc appears nowhere in the message"
    assert mail.sender == "shop@example.org"
    assert mail.recipients == ("someone@example.com", "bob@example.com", "carol@example.com",
                               "hidden@example.com"), "To, Cc, Bcc, each address once"
    assert message["Message-ID"].endswith("@example.org>"), "the job's sender's domain"


@pytest.mark.parametrize("value", [
    "Cửa hàng <shop@example.org>", "a@example.org", "  Bob   Smith  <b@example.com> ",
    "Bob<b@example.com>", "x y z <q+tag@sub.example.co.uk>", "Ông Nguyễn Văn A <a@ví-dụ.vn>",
])
def test_the_quick_reading_of_simple_mailboxes_agrees_with_parseaddr(value):
    from email.utils import parseaddr
    from mailqueue import addresses
    assert addresses._SIMPLE_MAILBOX.match(value), "takes the quick path"
    name, address = addresses.parse_mailbox(value, "sender")
    expected_name, expected_address = parseaddr(value)
    assert name == expected_name
    assert address == addresses.parse_recipient(expected_address)


def test_configured_sender_without_a_job_sender():
    mail = build()
    assert mail.sender == "noreply@example.com"
    assert parse(mail)["From"].addresses[0].display_name == "Hộp thư"


def test_internationalised_cc_needs_smtputf8():
    mail = build(cc=["người.nhận@ví-dụ.vn"])
    assert mail.smtputf8 and mail.recipients[1] == "người.nhận@ví-dụ.vn"
    assert not build(bcc=["bob@ví-dụ.vn"]).smtputf8
    assert build(bcc=["bob@ví-dụ.vn"]).recipients[1] == "bob@xn--v-d-rma6749a.vn"


def test_extra_headers_are_written_as_given_and_unicode_is_encoded():
    headers = {"List-Unsubscribe": "<https://example.org/u/42>, <mailto:u@example.org>",
               "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
               "X-Campaign": "tháng mười một", "X-Empty": ""}
    mail = build(headers=headers)
    message = parse(mail)
    for name, value in headers.items():
        assert message[name] == value
    assert b"\r\nX-Campaign: =?utf-8?b?" in mail.data and mail.data.isascii()


def test_intranet_domains_are_refused_by_default_and_accepted_when_allowed():
    for address in ("user@corp.local", "root@intranet", "ops@mail.internal.lan"):
        try:
            build(email=address)
        except BadMail as exc:
            assert "special-use" in str(exc) or "period" in str(exc)
        mail = build(email=address, smtp={"allow_local_domains": True},
                     sender="App <app@corp.local>", cc=["boss@intranet"])
        assert mail.recipients == (address, "boss@intranet")
        assert mail.sender == "app@corp.local"
    with pytest.raises(BadMail, match="special-use"):
        build(email="user@corp.local")
    with pytest.raises(BadMail, match="period"):
        build(email="root@intranet")
    with pytest.raises(BadMail, match="not a valid address"):
        build(email="bad..dots@corp.local", smtp={"allow_local_domains": True})


# ---------------------------------------------------------------------------
# Bad input: each refused with a reason that names the field
# ---------------------------------------------------------------------------

BAD = [
    # CR, LF and control characters in every field that becomes a header
    (dict(sender="shop@example.org\r\nBcc: injected@example.org"), "sender", "line break"),
    (dict(sender="Shop\n <shop@example.org>"), "sender", "line break"),
    (dict(reply_to="help@example.org\rBcc: injected@example.org"), "reply_to", "line break"),
    (dict(reply_to="Help\x07 <help@example.org>"), "reply_to", "control character"),
    (dict(cc=["ok@example.com", "c@example.com\nBcc: injected@example.org"]), "cc[2]",
     "line break"),
    (dict(bcc=["b@example.com\x00"]), "bcc[1]", "control character"),
    (dict(bcc=["b@example.com\u2028x"]), "bcc[1]", "line break"),
    (dict(headers={"X-A": "one\r\nBcc: injected@example.org"}), "X-A", "line break"),
    (dict(headers={"X-A": "tab\there"}), "X-A", "control character"),
    (dict(headers={"X-A": "next\u0085line"}), "X-A", "line break"),
    # encoded words (CVE-2024-6923) and parseaddr's misreading (CVE-2023-27043)
    (dict(headers={"X-A": "=?UTF-8?Q?=0A?=Bcc: injected@example.com"}), "X-A", "encoded word"),
    (dict(sender="=?utf-8?q?Evil=0ABcc=3A_x=40example.org?= <shop@example.org>"), "sender",
     "encoded word"),
    (dict(reply_to="alice@example.org(<injected@example.org>"), "reply_to", "not one address"),
    (dict(cc=["alice@example.org(<injected@example.org>"]), "cc[1]", "not one address"),
    # more than one address where one is expected
    (dict(sender="a@example.org, b@example.org"), "sender", "more than one address"),
    (dict(reply_to="a@example.org, b@example.org"), "reply_to", "more than one address"),
    (dict(reply_to="A <a@example.org>, B <b@example.org>"), "reply_to", "more than one address"),
    (dict(cc=["a@example.org, b@example.org"]), "cc[1]", "more than one address"),
    (dict(bcc=["a@example.org; b@example.org"]), "bcc[1]", "more than one address"),
    # invalid addresses anywhere
    (dict(sender="no-at-sign"), "sender", "not a valid address"),
    (dict(reply_to="a@-example.com"), "reply_to", "not a valid address"),
    (dict(cc=["ok@example.com", None]), "cc[2]", "NULL"),
    (dict(cc=[""]), "cc[1]", "empty"),
    (dict(bcc=["a@example..com"]), "bcc[1]", "not a valid address"),
    (dict(email="l" * 65 + "@example.com"), "email", "64"),
    (dict(cc=["l" * 65 + "@example.com"]), "cc[1]", "64"),
    (dict(sender="ắ" * 22 + "@example.com"), "sender", "66 octets"),
    (dict(bcc=["a@" + ".".join(["d" * 60] * 5) + ".com"]), "bcc[1]", "too long"),
    (dict(email="user@corp.local"), "email", "special-use"),
    # headers: not an object of strings, bad or reserved names
    (dict(headers=["X-A", "1"]), "headers", "JSON object"),
    (dict(headers="X-A: 1"), "headers", "JSON object"),
    (dict(headers=42), "headers", "JSON object"),
    (dict(headers={"X-A": 1}), "X-A", "must be a string"),
    (dict(headers={"X-A": None}), "X-A", "must be a string"),
    (dict(headers={"X-A": ["a"]}), "X-A", "must be a string"),
    (dict(headers={"X-A": {"b": "c"}}), "X-A", "must be a string"),
    (dict(headers={"X A": "1"}), "'X A'", "not a header name"),
    (dict(headers={"X_A": "1"}), "'X_A'", "not a header name"),
    (dict(headers={"X-A:": "1"}), "'X-A:'", "not a header name"),
    (dict(headers={"": "1"}), "''", "not a header name"),
    (dict(headers={"X-Ä": "1"}), "X-Ä", "not a header name"),
    (dict(headers={"X-A\r\nBcc": "1"}), "X-A", "not a header name"),
    (dict(headers={"X" * 77: "1"}), "XXX", "not a header name"),
    (dict(headers={"X-A": "x" * 501}), "X-A", "characters long"),
] + [
    (dict(headers={name: "x"}), name, "written by the queue itself")
    for name in ("From", "to", "CC", "Bcc", "Subject", "Date", "Message-ID", "Reply-To", "Sender",
                 "Return-Path", "MIME-Version", "Content-Type", "content-transfer-encoding",
                 "Content-Disposition", "Content-ID", "DKIM-Signature", "Received")
] + [
    # bodies
    (dict(content_message=None, html_message="  "), "html_message", "empty"),
    (dict(content_message=None, html_message="<p>\x1b[2J</p>"), "html_message",
     "control character"),
    (dict(content_message="text \x00", html_message="<p>x</p>"), "content_message",
     "control character"),
]


@pytest.mark.parametrize("columns, field, reason", BAD,
                         ids=["%d-%s" % (i, c[1][:20]) for i, c in enumerate(BAD)])
def test_bad_column_is_refused_naming_the_field(columns, field, reason):
    with pytest.raises(BadMail) as caught:
        build(**columns)
    message = str(caught.value)
    assert field in message and reason in message, message
    assert "\n" not in message and "\r" not in message


BAD_ATTACHMENTS = [
    (dict(filename=""), "filename is empty"),
    (dict(filename="   "), "filename is empty"),
    (dict(filename=None), "filename is empty"),
    (dict(filename="../../etc/passwd"), "is a path"),
    (dict(filename="/etc/passwd"), "is a path"),
    (dict(filename="dir/file.pdf"), "is a path"),
    (dict(filename="C:\\Users\\file.pdf"), "is a path"),
    (dict(filename=".."), "is a path"),
    (dict(filename="a\r\nContent-Type: text/html"), "line break"),
    (dict(filename="a\x00.pdf"), "control character"),
    (dict(filename="a" * 256), "characters long"),
    (dict(content_type="pdf"), "not of the form type/subtype"),
    (dict(content_type="text/plain\r\nBcc: x@example.org"), "not of the form"),
    (dict(content_type='text/plain; charset="utf-8\r\n"'), "not of the form"),
    (dict(content_type="multipart/mixed; boundary=x"), "builds the message's structure"),
    (dict(content_type="message/rfc822"), "builds the message's structure"),
    (dict(content_id="lo go"), "content_id"),
    (dict(content_id="<logo>\r\nBcc: x@example.org"), "content_id"),
    (dict(content_id=""), "content_id"),
]


@pytest.mark.parametrize("fields, reason", BAD_ATTACHMENTS)
def test_bad_attachment_is_refused_naming_it(fields, reason):
    good = attachment("good.pdf")
    bad = dict(attachment(), **fields)
    with pytest.raises(BadMail) as caught:
        build(html_message=HTML, attachments=[good, bad])
    assert "attachment 2" in str(caught.value) and reason in str(caught.value)


def test_two_inline_parts_with_one_content_id_are_refused():
    with pytest.raises(BadMail, match="same content_id"):
        build(html_message=HTML, attachments=[attachment("a.png", content_id="logo"),
                                              attachment("b.png", content_id="<logo>")])


def test_attachments_with_no_text_at_all_are_refused():
    with pytest.raises(BadMail, match="content_message is NULL"):
        build(content_message=None, attachments=[attachment()])


# ---------------------------------------------------------------------------
# DKIM
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def rsa_key():
    """(private key PEM, the DNS TXT record of its public half), made once."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def write_dkim_key(directory, pem=None):
    path = directory / "dkim.pem"
    path.write_bytes(rsa_key()[0] if pem is None else pem)
    return str(path)


def dns_for(selector, domain):
    """A DNS answer for dkimpy's verifier: the public key, under its one name."""
    def txt(name, timeout=5):
        return rsa_key()[1] if name == ("%s._domainkey.%s." % (selector, domain)).encode() else None
    return txt


def signed(tmp_path, **columns):
    key = signing.load_key({"domain": "example.org", "selector": "mail2026",
                            "private_key_file": write_dkim_key(tmp_path)})
    return build(smtp={"dkim": key}, **columns)


def test_dkim_signature_verifies_against_the_public_key(tmp_path):
    mail = signed(tmp_path, sender="Cửa hàng <shop@example.org>", cc=["c@example.com"],
                  html_message=HTML, attachments=[attachment("hoá đơn.pdf")],
                  headers={"List-Unsubscribe": "<https://example.org/u>",
                           "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"})
    assert mail.data.startswith(b"DKIM-Signature: ")
    assert dkim.verify(mail.data, dnsfunc=dns_for("mail2026", "example.org"))
    fields = dkim.util.parse_tag_value(parse(mail)["DKIM-Signature"].encode().replace(b"\r\n", b""))
    assert fields[b"c"] == b"relaxed/relaxed"
    assert (fields[b"d"], fields[b"s"]) == (b"example.org", b"mail2026")
    signed_headers = [h.strip() for h in fields[b"h"].split(b":")]
    for header in (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"mime-version",
                   b"content-type", b"list-unsubscribe", b"list-unsubscribe-post"):
        assert header in signed_headers
    assert signed_headers.count(b"from") == 2, "no From can be added"


def test_dkim_signature_breaks_when_the_body_or_a_header_is_changed(tmp_path):
    mail = signed(tmp_path, content_message=VIETNAMESE)
    dns = dns_for("mail2026", "example.org")
    assert dkim.verify(mail.data, dnsfunc=dns)
    head, body = mail.data.split(b"\r\n\r\n", 1)
    assert not dkim.verify(head + b"\r\n\r\n" + body[:-3] + b"x\r\n", dnsfunc=dns)
    assert not dkim.verify(head.replace(b"To: someone@", b"To: other@") + b"\r\n\r\n" + body,
                           dnsfunc=dns)
    assert not dkim.verify(b"From: evil@example.net\r\n" + mail.data, dnsfunc=dns)


def test_dkim_survives_relaxed_changes_a_relay_may_make(tmp_path):
    mail = signed(tmp_path, subject="Chào")
    refolded = mail.data.replace(b"Subject: ", b"Subject:   ", 1)
    assert dkim.verify(refolded, dnsfunc=dns_for("mail2026", "example.org"))


def dkim_config(tmp_path, **dkim_settings):
    settings = {"domain": "example.org", "selector": "mail",
                "private_key_file": write_dkim_key(tmp_path)}
    settings.update(dkim_settings)
    return {"smtp": {"dkim": settings}}


def test_dkim_configuration_is_read_at_start_up_and_never_shown(tmp_path):
    config = configuration.from_dict(dkim_config(tmp_path), "config.json")
    assert config.smtp.dkim.private_key.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert b"PRIVATE" not in repr(config.smtp.dkim).encode()
    assert "PRIVATE" not in repr(config) + repr(config.smtp)


@pytest.mark.parametrize("change, message", [
    (dict(private_key_file="/nonexistent/dkim.pem"), "cannot be read: No such file"),
    (dict(private_key_file="."), "cannot be read"),
    (dict(selector=""), "smtp.dkim.selector must be a non-empty string"),
    (dict(domain=None), "smtp.dkim.domain must be a non-empty string"),
    (dict(domain="example.org\r\nX: y"), "not a DNS name"),
    (dict(selector="s 1"), "not a DNS name"),
    (dict(algorithm="ed25519"), "unknown key smtp.dkim.algorithm"),
])
def test_bad_dkim_configuration_is_one_clear_line(tmp_path, change, message):
    with pytest.raises(ConfigError) as caught:
        configuration.from_dict(dkim_config(tmp_path, **change), "config.json")
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("content", [b"", b"not a key", b"-----BEGIN RSA PRIVATE KEY-----\n"
                                     b"AAAA\n-----END RSA PRIVATE KEY-----\n"])
def test_unreadable_dkim_key_is_one_clear_line(tmp_path, content):
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        configuration.from_dict(dkim_config(tmp_path, private_key_file=str(path)), "config.json")
    assert "not an unencrypted RSA private key in PEM" in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("raw, message", [
    ({"smtp": {"dkim": "key.pem"}}, "smtp.dkim must be a JSON object or null"),
    ({"smtp": {"allow_local_domains": "yes"}}, "smtp.allow_local_domains must be true or false"),
    ({"smtp": {"allow_local_domains": 1}}, "smtp.allow_local_domains must be true or false"),
    ({"smtp": {"max_message_bytes": 0}}, "smtp.max_message_bytes must be at least 1"),
    ({"smtp": {"max_message_bytes": True}}, "smtp.max_message_bytes must be a whole number"),
    ({"smtp": {"sender": "app@corp.local"}}, "special-use"),
])
def test_new_smtp_settings_are_checked(raw, message):
    with pytest.raises(ConfigError) as caught:
        configuration.from_dict(raw, "config.json")
    assert message in str(caught.value)


def test_new_smtp_settings_are_read():
    config = configuration.from_dict(json.loads(
        '{"smtp": {"allow_local_domains": true, "max_message_bytes": 1000000, '
        '"sender": "App <app@corp.local>", "dkim": null}}'))
    assert (config.smtp.allow_local_domains, config.smtp.max_message_bytes, config.smtp.dkim) == (
        True, 1000000, None)
