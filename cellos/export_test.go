package cellos

// Hooks for the external tests: the slow path the fast one is held to, and the matchers held to
// the patterns that messages quote.
var (
	ParseSlow       = parseSlow
	ValidEnvKey     = validEnvKey
	ValidLabelKey   = validLabelKey
	IDPattern       = idPattern
	EnvKeyPattern   = envKeyPattern
	LabelKeyPattern = labelKeyPattern
)

// DecodeStrict runs the fast decoder alone.
func DecodeStrict(data []byte) (*ExecutionCellDocument, bool) {
	doc := new(ExecutionCellDocument)
	return doc, decodeStrict(data, doc)
}

// DecodeSlow is the slow path without Validate: checkShape, then encoding/json.
func DecodeSlow(data []byte) (*ExecutionCellDocument, error) {
	if err := checkShape(data); err != nil {
		return nil, err
	}
	doc := new(ExecutionCellDocument)
	return doc, decodeJSON(data, doc)
}
