"""A tiny explicit-autograd toolkit: every layer has a forward and a hand-written backward."""
