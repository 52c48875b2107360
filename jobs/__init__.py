"""Demo jobs of spark-ray-udf: ``train_mnist`` then ``batch_predict`` (see each module)."""
