"""Monolith: recommendation-model training pieces for TensorFlow's TPUEstimator."""
