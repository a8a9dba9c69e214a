"""An example plugin of relayer's: a retry policy and a wire format."""
