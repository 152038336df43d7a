// Command agentry-lua-health runs an Argo CD resource health check (Lua) the way Argo CD does:
// a gopher-lua state with only the package, base and table libraries (Argo CD's default, without
// resource.customizations.useOpenLibs), the object as the global table `obj`, a one-second
// deadline, and the script's returned table read as {status, message}.
//
//	agentry-lua-health --script health.lua [object.yaml]    # object on stdin when no file
//	    prints {"status":"Healthy","message":"..."}
//	agentry-lua-health --tests dir/health_test.yaml [--script dir/health.lua]
//	    runs every case of Argo CD's test layout (tests: [{inputPath, healthStatus}]),
//	    prints a diff for each mismatch and exits 1 if any
//
// Without --script, the tests mode uses the only *.lua file next to health_test.yaml.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"time"

	lua "github.com/yuin/gopher-lua"
	"sigs.k8s.io/yaml"
)

// HealthStatus is Argo CD's health.HealthStatus as the Lua script returns it.
type HealthStatus struct {
	Status  string `json:"status"`
	Message string `json:"message,omitempty"`
}

// The codes Argo CD accepts; anything else becomes Unknown.
var validCodes = map[string]bool{
	"Unknown": true, "Progressing": true, "Healthy": true,
	"Suspended": true, "Degraded": true, "Missing": true,
}

type testFile struct {
	Tests []testCase `json:"tests"`
}

type testCase struct {
	InputPath    string       `json:"inputPath"`
	HealthStatus HealthStatus `json:"healthStatus"`
}

func main() {
	script := flag.String("script", "", "the health check (Lua)")
	tests := flag.String("tests", "", "an Argo CD health_test.yaml: run its cases")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: agentry-lua-health --script health.lua [object.yaml]\n       agentry-lua-health --tests health_test.yaml [--script health.lua]")
		flag.PrintDefaults()
	}
	flag.Parse()
	var err error
	if *tests != "" {
		if flag.NArg() != 0 {
			flag.Usage()
			os.Exit(2)
		}
		err = runTests(*tests, *script, os.Stdout)
	} else {
		if *script == "" || flag.NArg() > 1 {
			flag.Usage()
			os.Exit(2)
		}
		err = runOne(*script, flag.Arg(0), os.Stdout)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "agentry-lua-health:", err)
		os.Exit(1)
	}
}

func runOne(scriptPath, objectPath string, out io.Writer) error {
	script, err := os.ReadFile(scriptPath)
	if err != nil {
		return err
	}
	var raw []byte
	if objectPath == "" {
		raw, err = io.ReadAll(os.Stdin)
	} else {
		raw, err = os.ReadFile(objectPath)
	}
	if err != nil {
		return err
	}
	obj, err := decodeObject(raw)
	if err != nil {
		return err
	}
	hs, err := health(string(script), obj)
	if err != nil {
		return err
	}
	line, err := json.Marshal(HealthStatus{Status: hs.Status, Message: hs.Message})
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(out, "%s\n", line)
	return err
}

func runTests(testsPath, scriptPath string, out io.Writer) error {
	dir := filepath.Dir(testsPath)
	if scriptPath == "" {
		matches, _ := filepath.Glob(filepath.Join(dir, "*.lua"))
		if len(matches) != 1 {
			return fmt.Errorf("%d *.lua files next to %s: pass --script", len(matches), testsPath)
		}
		scriptPath = matches[0]
	}
	script, err := os.ReadFile(scriptPath)
	if err != nil {
		return err
	}
	raw, err := os.ReadFile(testsPath)
	if err != nil {
		return err
	}
	var tf testFile
	if err := yaml.UnmarshalStrict(raw, &tf); err != nil {
		return fmt.Errorf("%s: %w", testsPath, err)
	}
	if len(tf.Tests) == 0 {
		return fmt.Errorf("%s: no tests", testsPath)
	}
	failed := 0
	for _, tc := range tf.Tests {
		got, err := func() (*HealthStatus, error) {
			raw, err := os.ReadFile(filepath.Join(dir, tc.InputPath))
			if err != nil {
				return nil, err
			}
			obj, err := decodeObject(raw)
			if err != nil {
				return nil, err
			}
			return health(string(script), obj)
		}()
		switch {
		case err != nil:
			failed++
			fmt.Fprintf(out, "FAIL %s: %v\n", tc.InputPath, err)
		case *got != tc.HealthStatus:
			failed++
			fmt.Fprintf(out, "FAIL %s\n", tc.InputPath)
			diff(out, "status", tc.HealthStatus.Status, got.Status)
			diff(out, "message", tc.HealthStatus.Message, got.Message)
		default:
			fmt.Fprintf(out, "ok   %s: %s\n", tc.InputPath, got.Status)
		}
	}
	fmt.Fprintf(out, "%d/%d cases pass (%s)\n", len(tf.Tests)-failed, len(tf.Tests), filepath.Base(scriptPath))
	if failed > 0 {
		return fmt.Errorf("%d of %d cases fail", failed, len(tf.Tests))
	}
	return nil
}

func diff(out io.Writer, field, want, got string) {
	if want == got {
		fmt.Fprintf(out, "       %s: %q\n", field, want)
		return
	}
	fmt.Fprintf(out, "     - %s: %q\n     + %s: %q\n", field, want, field, got)
}

func decodeObject(raw []byte) (map[string]any, error) {
	js, err := yaml.YAMLToJSON(raw)
	if err != nil {
		return nil, fmt.Errorf("decoding the object: %w", err)
	}
	var obj map[string]any
	if err := json.Unmarshal(js, &obj); err != nil {
		return nil, fmt.Errorf("decoding the object: %w", err)
	}
	if obj == nil {
		return nil, errors.New("decoding the object: empty input")
	}
	return obj, nil
}

// health mirrors Argo CD's util/lua VM: runLua + GetHealthStatus.
func health(script string, obj map[string]any) (*HealthStatus, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	// Argo CD opens package, base and table (and a "safe" os with only time/date); string, math
	// and io are not available to health checks unless useOpenLibs is set.
	for _, lib := range []struct {
		name string
		fn   lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.fn), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, obj))
	if err := l.DoString(script); err != nil {
		return nil, err
	}
	ret := l.Get(-1)
	table, ok := ret.(*lua.LTable)
	if !ok {
		return nil, fmt.Errorf("expect table output from Lua script, not %s", ret.Type().String())
	}
	hs := &HealthStatus{}
	if v, ok := table.RawGetString("status").(lua.LString); ok {
		hs.Status = string(v)
	}
	if v, ok := table.RawGetString("message").(lua.LString); ok {
		hs.Message = string(v)
	}
	if !validCodes[hs.Status] {
		return &HealthStatus{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
	}
	return hs, nil
}

// toLua is Argo CD's decodeValue: objects and arrays become tables (arrays 1-based), numbers
// LNumber, JSON null nil.
func toLua(l *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(v)
	case string:
		return lua.LString(v)
	case float64:
		return lua.LNumber(v)
	case []any:
		t := l.NewTable()
		for _, item := range v {
			t.Append(toLua(l, item))
		}
		return t
	case map[string]any:
		t := l.NewTable()
		keys := make([]string, 0, len(v))
		for k := range v {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			t.RawSetString(k, toLua(l, v[k]))
		}
		return t
	default:
		return lua.LString(fmt.Sprint(v))
	}
}
