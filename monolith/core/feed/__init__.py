"""The runtime of the infeed/outfeed hook (`monolith.core.auto_checkpoint_feed_hook`).

* `signal`: the stop signal's feature name and how an outfeed result carries it;
* `controllers`: one feed thread and its queue of loop sizes (`FeedController`);
* `preemption`: the SIGTERM stop and why a run stopped.
"""
