"""Scaling laws (Kaplan et al. 2020; Hoffmann et al. 2022): plan IsoFLOP sweeps, run them resumably, fit the laws.

`accounting` counts parameters and FLOPs under the named conventions, `plan` lays out the sweep and estimates its
time, `runner` trains each run (hashed, resumable, lr-calibrated), `fits` implements approaches 1–3, `analysis`
turns run records into the summary, and `plots` draws it.
"""
