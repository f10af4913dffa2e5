"""Evaluation: sample-set metrics, their classifier, memorisation, reconstruction and the NLL bound."""
