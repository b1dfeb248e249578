"""The input side of end-of-stream training, used in the user's input_fn and model_fn.

* `stopping_signals`: `append_stopping_signals` flags real batches and
  appends the endless padding tail;
* `padding_steps`: `skip_padding_steps`, an optimizer wrapper under which a
  padding step changes nothing;
* `masked_loss`: `masked_mean_loss`, the loss of a partly real step under
  `StopRule.ALL_REPLICAS_PADDING`;
* `trained_batches`: `skip_trained_batches`, resuming the stream after the
  batches the restored checkpoint has trained;
* `resume_record`: the resume guard behind it (what the skip count rests on,
  registered in the graph, checked against model_dir's record by the feed hook).

They depend on the signal's name (`monolith.core.feed.signal`), not on the
feed hook. Users import them from `monolith.core.stopping_signals`.
"""
