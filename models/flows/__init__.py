"""Reversible networks: the NICE flow, RevNet and i-RevNet classifiers."""
