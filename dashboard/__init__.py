"""The live dashboard of the sidecar: ``sources`` (stats records -> rows; pure), ``feed`` (reading the stats
stream, the settings), ``policy`` (the throttle policy and the admin API), ``app`` (the Panel app:
``panel serve dashboard/app.py``, or ``dashboard()`` in a notebook). docs/dashboard.md describes the stats record
and how to run it."""
