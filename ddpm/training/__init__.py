"""Training: the loop of Algorithm 1 (Ho et al. 2020) and everything that makes a run resumable to the bit."""
