"""Bundles on disk: the one atomic writer, the manifest of a build, classifier and generation bundles, PEFT adapter
files in and out."""
