"""Data: record schema, conversation tokenization, images, datasets and preparation of raw data sets."""
