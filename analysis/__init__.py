"""Reading what the apps write and plotting it; the notebooks call only this package.

`analysis.plots`: plots of one run's request and step tables (latency CDFs, replica state
over time). `analysis.results`: capacity and surge outputs (`capacity.json`,
`surge_timeseries.csv`, `requests_<label>.parquet`) as tidy tables and plots. Pure functions
over tables and files; nothing here simulates or imports the Hydra apps.
"""
