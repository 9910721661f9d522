"""CAN and CGRAN (issue 13): within-dataset classification, gene scaling, markers, transfer."""
