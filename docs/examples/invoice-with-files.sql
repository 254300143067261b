-- A job and its two files in one statement, so in one transaction: no consumer
-- can take the job before its files are in. psql passes the files' bytes as
-- base64 in the variables logo and pdf; the command is in docs/writing-mails.md
-- ("Attachments from files on your machine").
WITH job AS (
  INSERT INTO jobs (email, subject, html_message)
  VALUES ('an@example.com', 'Hoá đơn #42',
          '<p><img src="cid:logo" alt="Cửa hàng"></p><p>Hoá đơn đính kèm.</p>')
  RETURNING job_id
)
INSERT INTO attachments (job_id, filename, content_type, content, content_id)
SELECT job_id, f.filename, f.content_type, f.content, f.content_id
  FROM job, (VALUES ('logo.png', 'image/png', decode(:'logo', 'base64'), 'logo'),
                    ('Hoá đơn 42.pdf', 'application/pdf', decode(:'pdf', 'base64'), NULL))
       AS f(filename, content_type, content, content_id);
