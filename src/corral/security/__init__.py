"""Cluster security: the PKI (root CA, node certificates, pinned join tokens) and who may call what."""
