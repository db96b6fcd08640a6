"""Harnesses for tests, the demo and the benchmarks (a real throwaway Dovecot, shared fakes). Never imported by the product."""
