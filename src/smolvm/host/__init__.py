"""Host capability checks (KVM speed probe, ...)."""
