"""A program that builds and runs a TF graph locally and never touches a TPU."""

import tensorflow as tf

with tf.Graph().as_default():
    total = tf.reduce_sum(tf.range(10))
    with tf.compat.v1.Session() as session:
        print("local sum:", session.run(total))
