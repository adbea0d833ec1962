package cellos

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"sync"

	"github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
)

// decodeOptions make decoding strict. json v2 refuses duplicate names (however escaped) and
// matches names in their exact case by default; unknown names are refused too. Invalid UTF-8
// in strings becomes U+FFFD, as encoding/json has always decoded documents.
var decodeOptions = json.JoinOptions(
	json.RejectUnknownMembers(true),
	jsontext.AllowInvalidUTF8(true),
	json.WithUnmarshalers(json.UnmarshalFromFunc(decodeUser)),
)

// spare is a decoder kept between documents, with its name tables and string cache: then a
// document costs little more than what it holds. Documents come seldom, and a sync.Pool, as
// json.Unmarshal uses, is emptied by garbage collections (and, under -race, at random).
var spare struct {
	sync.Mutex
	dec   jsontext.Decoder
	empty bytes.Buffer
}

// decode decodes one document, and nothing after it, into doc. Its errors name the field.
func decode(data []byte, doc *ExecutionCellDocument) error {
	dec := &spare.dec
	if spare.TryLock() {
		defer func() { dec.Reset(&spare.empty); spare.Unlock() }() // no reference to data is kept
	} else {
		dec = new(jsontext.Decoder) // the spare is busy with another document
	}
	dec.Reset(bytes.NewBuffer(data), decodeOptions)
	if err := json.UnmarshalDecode(dec, doc); err != nil {
		return describe(err)
	}
	if _, err := dec.ReadToken(); err != io.EOF {
		return errors.New("trailing data after the document")
	}
	return nil
}

// decodeUser decodes run.user, which must give both ids, neither of them null: a user without
// "gid" would run the cell in group 0, root's group. Validate cannot tell a 0 from an absent id.
func decodeUser(dec *jsontext.Decoder, u *UserSpec) error {
	var ids struct {
		UID *uint32 `json:"uid"`
		GID *uint32 `json:"gid"`
	}
	if err := json.UnmarshalDecode(dec, &ids); err != nil {
		return err
	}
	var missing FieldErrors
	for i, id := range [2]*uint32{ids.UID, ids.GID} {
		if id == nil {
			missing = append(missing, FieldError{Field: fieldPath(dec.StackPointer()) + [2]string{".uid", ".gid"}[i], Reason: "is required when user is given"})
		}
	}
	if missing != nil {
		return missing
	}
	u.UID, u.GID = *ids.UID, *ids.GID
	return nil
}

// describe words an error of json v2 for the author of the document.
func describe(err error) error {
	var missing FieldErrors
	var se *json.SemanticError
	var syn *jsontext.SyntacticError
	switch {
	case errors.As(err, &missing): // from decodeUser
		return missing
	case errors.As(err, &se) && se.Err == json.ErrUnknownName:
		reason := "unknown field"
		if name, _ := field(se.GoType, se.JSONPointer.LastToken(), strings.EqualFold); name != "" {
			reason += fmt.Sprintf(" (did you mean %q?)", name) // the same letters in another case
		}
		return FieldError{Field: fieldPath(se.JSONPointer), Reason: reason}
	case errors.As(err, &se) && se.GoType != nil:
		got := cmp.Or(gave[se.JSONKind], se.JSONKind.String())
		if se.JSONKind == '0' && len(se.JSONValue) > 0 {
			got = truncate(string(se.JSONValue), 32) // a number out of range or with a fraction
		}
		return FieldError{Field: fieldPath(se.JSONPointer),
			Reason: "expected " + cmp.Or(wants[se.GoType.Kind()], "an integer within "+se.GoType.String()) + ", got " + got}
	case errors.As(err, &syn) && syn.Err == jsontext.ErrDuplicateName:
		return FieldError{Field: fieldPath(syn.JSONPointer), Reason: "duplicate key"}
	case err == io.EOF || errors.As(err, &syn) && syn.Err == io.ErrUnexpectedEOF:
		return errors.New("malformed JSON: the document ends early")
	case errors.As(err, &syn):
		return fmt.Errorf("malformed JSON at byte %d: %w", syn.ByteOffset, syn.Err)
	}
	return err
}

// What a type error says the document wanted (by the Go kind of the field) and got.
var (
	wants = map[reflect.Kind]string{reflect.Struct: "an object", reflect.Map: "an object", reflect.Slice: "an array",
		reflect.String: "a string", reflect.Bool: "true or false"}
	gave = map[jsontext.Kind]string{'{': "an object", '[': "an array", '"': "a string", '0': "a number"}
)

// fieldPath turns a JSON pointer into the path errors name: "/spec/mounts/2/type" is
// "spec.mounts[2].type". The document's types tell list indexes from keys that are numbers.
func fieldPath(p jsontext.Pointer) string {
	path, t := "", reflect.TypeFor[ExecutionCellDocument]()
	for tok := range p.Tokens() {
		switch t.Kind() {
		case reflect.Slice:
			path, t = path+"["+tok+"]", t.Elem()
			continue
		case reflect.Map:
			t = t.Elem()
		case reflect.Struct:
			_, t = field(t, tok, func(a, b string) bool { return a == b })
		}
		path = strings.TrimPrefix(path+"."+tok, ".")
	}
	return cmp.Or(path, "(document)")
}

// field finds the field of struct t whose JSON name matches key: its name, and its type with
// pointers followed. Without one it returns "" and the type of JSON values no rule knows.
func field(t reflect.Type, key string, match func(name, key string) bool) (string, reflect.Type) {
	for i := 0; t != nil && t.Kind() == reflect.Struct && i < t.NumField(); i++ {
		f := t.Field(i)
		if name, _, _ := strings.Cut(f.Tag.Get("json"), ","); match(name, key) {
			for t = f.Type; t.Kind() == reflect.Pointer; t = t.Elem() {
			}
			return name, t
		}
	}
	return "", reflect.TypeFor[any]()
}

// peekID finds spec.id in a document that may not decode (a wrong type, trailing data, a
// truncated prefix), so that errors can name the cell. It reads no further than the id.
func peekID(data []byte) string {
	dec := jsontext.NewDecoder(bytes.NewBuffer(data), jsontext.AllowInvalidUTF8(true), jsontext.AllowDuplicateNames(true))
	for _, want := range []string{"spec", "id"} {
		if tok, err := dec.ReadToken(); err != nil || tok.Kind() != '{' {
			return ""
		}
		for name, err := dec.ReadToken(); name.Kind() != '"' || name.String() != want; name, err = dec.ReadToken() {
			if err != nil || name.Kind() != '"' || dec.SkipValue() != nil {
				return "" // broken, or the end of the object
			}
		}
	}
	if tok, err := dec.ReadToken(); err == nil && tok.Kind() == '"' && ValidID(tok.String()) {
		return tok.String()
	}
	return ""
}
