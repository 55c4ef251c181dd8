"""One small module per CLI verb: arguments → one library call → output."""
