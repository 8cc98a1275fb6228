"""Stage 1, the rows: reading and writing datasets (`io`), their Arrow columns (`columns`), and
instruction formats -> token ids with the loss on the response only (`formatting`)."""
