"""The datasets that ship with ptbundle, as package data (see README.md here); read through ptbundle.runtime.data."""
