"""Small helpers every part of `monolith.core` shares.

* `tf_version`: the supported TensorFlow range, checked on import;
* `validation`: `positive_int`, one check for every count argument;
* `tpu_context`: finding the enclosing TPU replicate context and summing
  over replicas;
* `scoped_patch`: `ScopedPatch`, a thread-scoped, reference-counted
  replacement of a TensorFlow attribute, for where TensorFlow has no hook.
"""
