"""Small helpers every part of `monolith.core` shares.

* `tf_version`: the supported TensorFlow range, checked on import;
* `validation`: `positive_int`, one check for every count argument;
* `tpu_context`: finding the enclosing TPU replicate context and summing
  over replicas;
* `env_switch`: the on/off switches read from the environment;
* `model_dir`: whether a model_dir is a writable directory;
* `restore_errors`: a broken or foreign checkpoint explained in a few lines;
* `scoped_patch`: `ScopedPatch`, a thread-scoped, reference-counted
  replacement of a TensorFlow attribute, for where TensorFlow has no hook.
"""
