-- /sync asks which rooms have new receipts in a window of the stream.
CREATE INDEX receipts_by_position ON receipts (stream_ordering);
