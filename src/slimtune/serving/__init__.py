"""The rooms of serving, each one job: `residency` (which tunings the bank holds), `kv` (the running batch's
KV cache), `fairness` (whose turn it is), `sampling` (a row's next token), `text` (a row's text as its tokens
come). The engine that schedules them is `slimtune.engine.Engine`."""
