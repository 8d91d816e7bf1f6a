-- Reminders are read by the silo owning their ring range, and only those due soon: each row keeps the due
-- time of its next undelivered tick (moved forward as ticks are delivered). The ring is cut into 1024 buckets
-- (the hash's top ten bits), and the index orders each bucket's rows by due time: a silo seeks every bucket
-- of its ranges up to its horizon and reads only what is due, however many reminders lie further ahead.
ALTER TABLE grains_reminders ADD COLUMN next_due TIMESTAMPTZ;
UPDATE grains_reminders SET next_due = start_at;
ALTER TABLE grains_reminders ALTER COLUMN next_due SET NOT NULL;

DROP INDEX grains_reminders_by_hash;
CREATE INDEX grains_reminders_by_bucket_due ON grains_reminders ((grain_hash >> 22), next_due);
