package cellos

// Hooks for the external tests: the matchers held to the patterns that messages quote.
var (
	ValidEnvKey     = validEnvKey
	ValidLabelKey   = validLabelKey
	IDPattern       = idPattern
	EnvKeyPattern   = envKeyPattern
	LabelKeyPattern = labelKeyPattern
)
