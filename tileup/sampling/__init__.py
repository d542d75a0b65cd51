"""Sampler and schedule names, fixed step planning, the step loop, guidance and prompts."""
