-- Pull mode: the channel a device first registered on ("mqtt" or "poll"),
-- shown by `otter devices list`. NULL until the device registers.
ALTER TABLE devices ADD COLUMN registered_via TEXT;
