"""Wire types: request decoding and response shapes for the native API."""
