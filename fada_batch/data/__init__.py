"""The data side: categories, label sheets, images, one category's data and its problems, the
split by image, the question/answer samples and the pre-flight check. Knows nothing of torch."""
