"""The runtime of the infeed/outfeed hook (`monolith.core.auto_checkpoint_feed_hook`).

* `session`: `FeedSession`, one training session's runtime: the two feed
  threads, their state, the wait for the outfeed, the stop decision;
* `controllers`: one feed thread and its queue of loop sizes (`FeedController`);
* `signal`: the stop signal's feature name, how an outfeed result carries it,
  and the stop rule every reader follows (`StopRule`, `follow_stop_rule`);
* `stop_step`: the step that stopped training (which replicas still had real
  data) and the warning under the default rule;
* `preemption`: the SIGTERM stop and why a run stopped;
* `model_dir_guard`: the run's hold on its model_dir (`model_dir_lock`: one
  process at a time; the resume check of `end_of_stream.resume_record`);
* `graph`: what the hook builds in `begin()`, and the TPU step's stop flag;
* `tpu_system`: the TPU steps of `after_create_session` (init, init ops, watchdog).
"""
