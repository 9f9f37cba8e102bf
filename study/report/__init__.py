"""``ssl-study report NAME``: PNG figures and one HTML page that sums up a study.

Under ``<study_dir>/report/`` (or ``--out DIR``), each file written to a temporary name then renamed
(``data.atomic``), one module of this package per file:

- ``curves.png`` (``curves``): kNN top-1, training loss and dense-kNN minimum per epoch, one line per trial
  coloured by status (dashed: stopped by the instability policy), instability events marked at their epoch;
- ``events.png`` (``events``): every instability event by training step, one row per trial (the paper's "spike
  precedes the dip" view);
- ``stopped.png`` (``stopped``): each run judged unstable, its kNN against the noise it was judged by
  and the verdict's epoch;
- ``heatmap.png`` (``heatmap``, over the cells of ``grid``): the final study metric over two parameters, as the
  paper's batch x lr table (``--params A B``; default base_lr x batch_size, else the two searched parameters
  with the most distinct values); a study that searched one range (the bundled study's base_lr) gets a scatter
  of its trials on that parameter's own axis (log for a log range), coloured by status, instead;
- ``status.png`` (``status_counts``): trials by status;
- ``importance.png`` (``importance``): parameter importance from the Optuna storage (PED-ANOVA);
- ``parallel.png`` (``parallel``): parallel coordinates over the searched parameters and the metric;
- ``report.html`` (``page``): a summary table of the trials, their evaluations (``ssl-study evaluate``) if any,
  and the figures.

``data`` reads the results tables, ``style`` holds what the figures share, ``write`` puts it all together and
``command`` is the CLI's subcommand. Figures are drawn with matplotlib's object API
(``matplotlib.figure.Figure``, saved through the Agg canvas): no pyplot, no global backend switch, nothing shown
on screen; matplotlib is imported only when a report is written.

Static PNGs, not plotly (judged on the reports of the tests' real studies, 2-4 trials, and the bundled study's
shape): the curves label each trial's line up to 12 trials and the page's table holds every exact value, so
hovering adds little at these sizes, while plotly would add a pinned dependency and several MB of plotly.js
inlined in each page (cluster nodes and a report uploaded to S3 have no CDN to fetch it from). Interactive plots
of the same study, hover and parallel-coordinate brushing included, are optuna-dashboard's, on the study's Optuna
storage (docs/results-and-storage.md gives the command for each storage).
"""

from study.report.command import add_report_arguments, report_from_args
from study.report.data import StudyData, load
from study.report.grid import heatmap_params
from study.report.write import write_report

__all__ = ["StudyData", "add_report_arguments", "heatmap_params", "load", "report_from_args", "write_report"]
