"""Host-side networking for the netns runtime (bridges, VXLAN, task namespaces)."""
