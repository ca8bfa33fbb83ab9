"""Shards: the webdataset format of teacher features, its manifest, writer and training stream."""
