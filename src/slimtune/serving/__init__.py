"""The rooms of serving, each one job: `fairness` (whose turn it is), `text` (a row's text as its tokens
come). The public `Engine` stays importable as `slimtune.engine.Engine`."""
