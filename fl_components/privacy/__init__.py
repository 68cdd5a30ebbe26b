"""Differential privacy: the site's ledger, DP-SGD (Opacus), DP-FedAvg and its accountant.

Nothing here imports Prefect; the coordinator's tasks and the site call these functions.
"""
