-- Inbox retention: a read message is kept a week after it was read (so when it was read is needed), an unread
-- one a month after it was sent. Messages read before this column existed count as read when sent.
ALTER TABLE inbox ADD COLUMN read_at INTEGER;
