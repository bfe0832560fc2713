"""ptbundle.builder: train a soft prompt on a frozen encoder and export bundles."""
