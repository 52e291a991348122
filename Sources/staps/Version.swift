/// The release, as in the repository's VERSION file (a test keeps the two equal).
let stapsVersion = "0.3.0"
