"""The pieces behind the host calls (`monolith.core.base_host_call`,
`monolith.core.base_embedding_host_call`).

* `names`: the names the host call gives a meaning to, and how they are matched;
* `tensor_checks`: what a recorded tensor must be;
* `layout`: compress per-dtype on the TPU side, decompress on the host;
* `steps`: the global-step read each host-call summary is logged under;
* `cached_window`: caching per-step metrics in TPU variables (roll-and-add);
* `summaries`: AUC, DeepInsight and scalar summaries written on the host.
"""
