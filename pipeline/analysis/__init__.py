"""Pathology classifiers with patient-grouped statistics, interpretation figures and the report."""
