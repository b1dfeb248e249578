"""Private building blocks of `monolith.core.testing` (the CPU emulator of the TPU loop).

One module per concern: `options` (the frozen options every builder takes),
`user_params` (what `input_fn`/`model_fn` receive, as TPUEstimator passes it),
`infeed`, `step` and `outfeed` (the three graph pieces), `graph` (wires them and
the feed hook), `session` (the TPUEstimator.train-like run). Import the public
names from `monolith.core.testing`, not from here.
"""
